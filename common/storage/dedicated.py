"""One connection kept for a process's busiest loop.

redis-py's client takes a connection out of its pool and puts it back for every command, checks the
socket for stray data, and wraps the command in its retry and telemetry layers. For the few commands
a process runs per trade batch that is most of their client CPU: the same 23-argument EVALSHA on the
local Redis costs 33 µs of client CPU through the client and 18 µs sent on one of its connections
directly (redis-py 8.2, measured in a loop on the 2-core test machine). The writer's read, apply and
ACK and ingest's bus publish run on a connection of this kind; everything else stays on the client.

The connection is one of the client's own (same address, credentials, TLS, name and timeouts) and the
commands go through redis-py's packer, parser and response callbacks, so replies and errors are the
same as the client's. It belongs to one thread. A connection or timeout error drops the socket and,
where the client's retry policy says so, the command is sent again on a new one; otherwise it is
raised and the next command connects again, as the pool would. Every send starts with connect() (a
no-op while connected), as the pool does when it hands a connection out: a Sentinel-managed
connection asks the sentinels for the master only there, and a send left to reconnect by itself
would go back to the address it had, a dead master after a failover.
"""

from redis.exceptions import NoScriptError, ResponseError


class DedicatedConnection:
    def __init__(self, client):
        self.client = client
        self.connection = None

    def _connection(self):
        if self.connection is None:
            self.connection = self.client.connection_pool.get_connection()
        return self.connection

    def call(self, *args, **options):
        """One command and its reply, parsed as the client would (options as the client takes them)."""
        connection = self._connection()

        def send_and_read():
            connection.connect()
            connection.send_command(*args)
            return self.client.parse_response(connection, args[0], **options)
        return self._with_retry(connection, send_and_read)

    def call_many(self, commands) -> list:
        """Several commands in one round trip; each reply in order, a refused command's error in its
        place (every reply is read, so the connection stays in step)."""
        connection = self._connection()

        def send_and_read():
            connection.connect()
            connection.send_packed_command(connection.pack_commands(commands))
            replies = []
            for _ in commands:
                try:
                    replies.append(connection.read_response())
                except ResponseError as error:
                    replies.append(error)
            return replies
        return self._with_retry(connection, send_and_read)

    @staticmethod
    def _with_retry(connection, send_and_read):
        """The client's own retry policy (the connection carries it): a broken connection is dropped
        and, where the client allows, the command is sent again on a new one, as the client does."""
        return connection.retry.call_with_retry(send_and_read, lambda error: connection.disconnect())

    def run_script(self, script, script_keys, args):
        """A registered script (redis-py's Script) by its hash; loaded again if the server lost it."""
        try:
            return self.call("EVALSHA", script.sha, len(script_keys), *script_keys, *args)
        except NoScriptError:
            self.client.script_load(script.script)
            return self.call("EVALSHA", script.sha, len(script_keys), *script_keys, *args)
