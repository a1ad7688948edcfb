"""Training scripts for the models dicom-node ships (run by hand; CI only smoke-tests them)."""
