"""Suppression list import and export jobs (SES's CreateImportJob, CreateExportJob) and their files."""
