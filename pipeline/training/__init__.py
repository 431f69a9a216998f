"""Training: data modules that feed the prepared data to Lightning, the LightningModules and the fit loop."""
