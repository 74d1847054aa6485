"""Where messages come from: files (mbox, Maildir, .eml) for import, and the mailbox sources
fetch and watch read (IMAP), each one module behind the protocol in mailbox.py."""
