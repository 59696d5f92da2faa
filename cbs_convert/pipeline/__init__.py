"""The conversion: the recipe, the runner over the stages, the ranks of a distributed run, the report."""
