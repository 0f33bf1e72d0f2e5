"""medbank: curation of medical images and masks into training samples."""
