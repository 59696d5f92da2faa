"""The conversion: the recipe, the stages as plain functions, the runner over them, the ranks of a
distributed run, the report."""
