"""The project's exceptions. Driver errors are translated into these at each boundary."""

from __future__ import annotations


class MailDaemonError(Exception):
    """maildaemon failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigError(MailDaemonError):
    """The configuration is invalid."""


class StartupError(MailDaemonError):
    """A startup step failed."""


class StoreUnavailable(MailDaemonError):
    """PostgreSQL is unreachable or refused the operation; retry later."""


class StoreReadOnly(StoreUnavailable):
    """PostgreSQL answers but refuses to write (a demoted primary); retry later."""


class StoreRejected(MailDaemonError):
    """PostgreSQL refused the data itself (not a connection problem)."""


class StoreFailed(MailDaemonError):
    """PostgreSQL refused the operation for another reason (a login or privilege refused, a
    missing table): neither an outage nor the data's fault; retrying will not help."""


class TemplateError(MailDaemonError):
    """A template could not be parsed or rendered."""


class RenderError(TemplateError):
    """Rendering a delivery failed permanently (missing variable, bad template)."""


class CatalogError(TemplateError):
    """The template catalog is broken."""


class TransportError(MailDaemonError):
    """An SMTP exchange failed.

    ``code`` and ``text`` carry the server's reply when there was one; ``stage`` names the
    step that failed (``connect`` (TCP and banner), ``ehlo``, ``starttls``, ``auth``,
    ``mail``, ``rcpt``, ``data``, ``end of data``) when it is known.
    """

    permanent = False

    def __init__(
        self,
        message: str | None = None,
        *,
        code: int | None = None,
        text: str | None = None,
        stage: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.text = text
        self.stage = stage


class TransientTransportError(TransportError):
    """The SMTP server or the link failed in a way worth retrying."""


class PermanentTransportError(TransportError):
    """The SMTP server refused the message for good (5xx)."""

    permanent = True


class MessageTooLarge(PermanentTransportError):
    """The message is larger than the SMTP server accepts (its SIZE, RFC 1870); it was
    refused before it was sent, and sending it again would not change that."""

    failure_code = "message_too_large"

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"{self.failure_code}: the message is {size} octets, "
            f"the SMTP server accepts at most {limit} (SIZE)",
            stage="mail",
        )
        self.size = size
        self.limit = limit


class InsecureTransportError(TransientTransportError):
    """The server did not offer STARTTLS or the TLS handshake failed; nothing was sent."""


class TransportTimeout(TransientTransportError):
    """The SMTP exchange did not finish within MAIL_SMTP_TIMEOUT."""


class NotBegun(TransportError):
    """No SMTP transaction was begun (the daemon is stopping or the destination is down);
    nothing was sent and the claim is given back."""


class UnknownOutcome(TransientTransportError):
    """The link was lost after the message data was sent, before the server's reply."""


# --- operator refusals (the HTTP API maps .status and .code) ---------------------------


class OperatorError(MailDaemonError):
    """The operator request was refused."""

    status = 500
    code = "error"

    def __init__(
        self, message: str | None = None, *, field: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.field = field
        if code is not None:
            self.code = code


class InvalidInput(OperatorError):
    """A request field is invalid."""

    status = 400
    code = "invalid_input"


class NotFound(OperatorError):
    """No such object."""

    status = 404
    code = "not_found"


class Conflict(OperatorError):
    """The object is not in a state that allows this action."""

    status = 409
    code = "conflict"


class Unavailable(OperatorError):
    """This operation is not available right now."""

    status = 503
    code = "unavailable"


class QueryTimeout(Unavailable):
    """The query ran longer than the operator API's statement timeout; narrow the filter."""

    code = "query_timeout"
