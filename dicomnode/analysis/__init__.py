"""Analysis: analyzer plugins, durable completion, jobs, and write-back through intake.

Analyzers are found through the ``dicomnode.analyzers`` entry-point group; built-ins are
registered the same way. See `plugin.Analyzer` for the interface and `runner.AnalysisService`
for how units become jobs and jobs become filed results.
"""
