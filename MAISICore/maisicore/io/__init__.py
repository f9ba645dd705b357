"""Files and geometry: volumes (NIfTI/NRRD) with index→RAS affines, reorientation, previews."""
