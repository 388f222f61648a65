"""Sluice's policy as code: checkov custom checks over the CloudFormation templates (infra/validate.sh).

Each check guards a decision a generic linter cannot know (see docs/deploy.md, Checks); each has a test
in tests/infra/test_infra_rules.py that breaks a copy of the templates and sees the check fail.
"""
