"""`hydra/launcher=runnerd`: a Hydra multirun as a runnerd sweep (see runnerd_client.hydra)."""
