"""Exposure notices leaving the system: the outbox worker (``notifier``) and the SMS
senders it and the one-time codes use (``sms``)."""
