"""The HTTP server under the health and read APIs: a thread per connection with a cap on them, and a
deadline for each request, so idle or slow clients (before any token is checked) cannot hold threads."""

import io
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# A local client (bin/health, Prometheus, a proxy) sends its request in milliseconds.
REQUEST_DEADLINE_S = 5.0
MAX_CONNECTIONS = 64


class BoundedHTTPServer(ThreadingHTTPServer):
    """A thread per connection, at most max_connections of them: one more is closed at once. Idle
    ones are dropped within REQUEST_DEADLINE_S, so the API comes back by itself after a flood."""

    daemon_threads = True
    block_on_close = False                  # stopping must not wait for a client's deadline
    request_queue_size = MAX_CONNECTIONS    # a burst of clients waits to be accepted, not refused

    def __init__(self, address, handler, log, max_connections: int = MAX_CONNECTIONS):
        self.log = log
        self.slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()            # no thread took the slot
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request, client_address):
        # A client that hung up or stopped reading: one debug line, not the default traceback.
        error = sys.exc_info()[1]
        self.log.debug("http_client_error", client=client_address[0], error=type(error).__name__)


class DeadlineReader(io.RawIOBase):
    """The request as it arrives, but never past the connection's deadline: a client sending a
    byte at a time, each within the socket timeout, is cut off all the same."""

    def __init__(self, sock, deadline: float):
        self.sock = sock
        self.deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the request took longer than its deadline")
        self.sock.settimeout(remaining)
        return self.sock.recv_into(buffer)


class DeadlineHandler(BaseHTTPRequestHandler):
    """A request handler whose request must arrive within REQUEST_DEADLINE_S, however slowly it trickles."""

    # The socket's timeout: bounds the first read, and each write of the answer.
    timeout = REQUEST_DEADLINE_S

    def setup(self):
        super().setup()
        # Read through the deadline; the read timeout that BaseHTTPRequestHandler catches
        # (TimeoutError) closes the connection.
        plain, deadline = self.rfile, time.monotonic() + REQUEST_DEADLINE_S
        self.rfile = io.BufferedReader(DeadlineReader(self.connection, deadline))
        plain.close()

    def log_message(self, fmt, *args):
        pass                            # one line per event, not per request
