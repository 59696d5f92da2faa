"""The stages of a conversion, each a plain function: profile, split, prune (width and depth), fine-tune."""
