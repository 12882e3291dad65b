print("bench-batch: not yet written")
