-- Users and permissions of the basic-auth app live in their own database beside the tracking one.
CREATE DATABASE mlflow_auth OWNER mlflow;
