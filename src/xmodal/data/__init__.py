"""Data: the prepared format, importers, text and image preprocessing, Shapes data sets."""
