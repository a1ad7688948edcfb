"""The operator's view: web dashboard, REST API and Prometheus metrics, served by `dicom-node serve`."""
