"""Content filtration of outgoing mail: virus scanning (clamd) and spam scoring (rspamd), run by the
delivery workers before a message is signed. See docs/filtration.md."""
