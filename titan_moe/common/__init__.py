"""The ground both data_prep and the trainer stand on: error types, storage, the prep/train contract."""
