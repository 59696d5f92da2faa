"""The runtime of routed models: time routing over K experts, and shared-base experts."""
