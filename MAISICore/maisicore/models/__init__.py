"""Model definitions: presets (hyper-parameters, grid rules), MONAI network builders, weight files and the official-weights client."""
