"""Who may use the DPO's pages: the roles a signed-in account or an OIDC claim can carry."""

ROLES = ("dpo", "auditor")  # the dpo changes and signs; the auditor reads
