"""The xray-sentinel DICOM gateway daemon and its operator commands."""
