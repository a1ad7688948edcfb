"""One-off converters from published weights (in ``../shared/realdata/weights``) to the shipped bundles'
``models/model.pt``. Run once by a maintainer; never needed at run time."""
