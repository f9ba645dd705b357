"""The autoencoder's decode paths and the exact tensor-splitting engine with its memory planner."""
