"""The replica process: hosts user code."""
