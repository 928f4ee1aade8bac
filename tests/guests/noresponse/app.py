"""Returns from the handler without ever setting a response."""

from wit_world import exports


class IncomingHandler(exports.IncomingHandler):
    def handle(self, request, response_out) -> None:
        return None
