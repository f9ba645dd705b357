"""Qt-free parts of the MAISIGenerate module: parameters, MRML <-> maisicore conversion, the
generation logic and the worker process (shared with MAISITrain)."""
