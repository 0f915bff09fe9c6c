"""Real clients a hospital connects to the node, started by the tests on loopback: the OHIF
viewer (its npm build, served by a static server with a token-adding reverse proxy, driven in
Debian's Chromium) and Orthanc from Debian (as a DICOMweb client and a DIMSE peer)."""
