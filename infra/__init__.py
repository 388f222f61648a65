"""Sluice's deployment: CloudFormation templates, the deploy tool and the Cassandra discovery helper."""
