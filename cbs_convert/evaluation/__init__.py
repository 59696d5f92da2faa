"""Sample quality: the bundled classifiers, Fréchet distances, the bundled data sets."""
