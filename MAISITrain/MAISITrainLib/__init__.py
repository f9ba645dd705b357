"""Qt-free parts of the MAISITrain module: training command lines, the training job and the loss curve."""
