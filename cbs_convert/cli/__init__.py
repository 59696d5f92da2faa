"""The command line: convert, info, extract, profile, schedule and sample over one parser and error guard."""
