"""dicomnode: a DICOM node for image analysis with governance built in."""

__version__ = "0.1.0"
