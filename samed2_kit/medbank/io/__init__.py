"""medbank.io: readers for image files, volumes and DICOM."""
