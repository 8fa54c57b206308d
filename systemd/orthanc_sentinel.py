"""Orthanc's "PythonScript": screen every C-STORE with xray-sentinel (README, "Inside Orthanc")."""
from gateway.orthanc_plugin import install

install()
