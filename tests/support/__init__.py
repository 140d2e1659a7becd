"""Real components the tests run: journald, POP3/IMAP servers, SMTP servers, launchers."""
