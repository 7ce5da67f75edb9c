"""`make mutants`: one significant mutation per module of shared/ and services/*/src, each of
which the tests must catch. A mutant is the source tree copied with one line changed (a check
deleted or inverted, a bound moved); the tests named for it run with that copy first on
PYTHONPATH (service processes started by the tests inherit it). A mutant the tests do not kill
is a survivor: the table and the tests are for finding those.

    python tests/mutants.py [--only NAME]   # prints a Markdown report; exit 1 on a survivor
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = [
    "shared/framing/src", "shared/servicekit/src",
    "services/echo/src", "services/cmdexec/src", "services/udp/src", "services/probe/src",
]  # fmt: skip
FW = "shared/framing/src/wirekit_framing/"
SK = "shared/servicekit/src/wirekit_servicekit/"
EC = "services/echo/src/wirekit_echo/"
CX = "services/cmdexec/src/wirekit_cmdexec/"
UD = "services/udp/src/wirekit_udp/"
CODEC_T = "shared/framing/tests"
ECHO_T = "services/echo/tests/test_echo.py services/echo/tests/test_hostile.py"
CX_T = "services/cmdexec/tests"
UDP_T = "services/udp/tests"
PR = "services/probe/src/wirekit_probe/"
PROBE_T = "services/probe/tests"
SK_T = "shared/servicekit/tests"


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: str  # pytest arguments


MUTANTS = [
    # framing
    Mutant("codec: oversize header accepted", FW + "_codec.py",
           "        if n > limit:\n            return frames, pos, -2 - n",
           "        if n > limit + 1:\n            return frames, pos, -2 - n", CODEC_T),
    Mutant("codec: relay returns the pending header", FW + "_codec.py",
           "                buf += memoryview(data)[end:]\n        self._need = need\n        return count, wire",
           "                buf += memoryview(data)[end:]\n                wire = data\n        self._need = need\n        return count, wire",
           CODEC_T),
    Mutant("codec: relay's one-frame path skips the size bound", FW + "_codec.py",
           "            if n + HEADER_SIZE == len(data) and n <= self.max_frame_size:",
           "            if n + HEADER_SIZE == len(data):", CODEC_T),
    Mutant("errors: frames before the error dropped", FW + "_errors.py",
           "        self.frames = list(frames)", "        self.frames = []", CODEC_T),
    Mutant("socket adapter: EOF mid-header is clean", FW + "_socket.py",
           "            raise IncompleteFrame(missing=n - got, buffered=got_before + got)",
           "            return buf", "shared/framing/tests"),
    Mutant("asyncio adapter: no size check", FW + "_asyncio.py",
           "    if size > max_frame_size:", "    if False:", "shared/framing/tests"),
    Mutant("proxy parser: v1 lines of any length", FW + "_proxy.py",
           "MAX_V1_LINE = 107", "MAX_V1_LINE = 1007", "shared/framing/tests"),
    # servicekit
    Mutant("hub: per-source limit off by one", SK + "hub.py",
           "        elif from_source >= self.limits.per_source:",
           "        elif from_source > self.limits.per_source:", ECHO_T + " -k tricklers"),
    Mutant("hub: idle closes early", SK + "hub.py",
           "            elif now - entry.seen >= idle_s:",
           "            elif now - entry.seen >= idle_s * 0.7:", ECHO_T + " -k idle"),
    Mutant("hub: no frame deadline", SK + "hub.py",
           "            if started and now - started >= frame_s:", "            if False:",
           ECHO_T + " -k trickle"),
    Mutant("reset is a FIN", SK + "sockets.py",
           "            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)",
           "            pass", ECHO_T + " -k oversize"),
    Mutant("ratelimit: a bucket never refills", SK + "ratelimit.py",
           "        tokens = self.tokens + (now - self.stamp) * self.rate",
           "        tokens = self.tokens", UDP_T + "/test_defences.py"),
    Mutant("ratelimit: a source's bucket never refills", SK + "ratelimit.py",
           "        tokens = bucket.tokens + (now - bucket.stamp) * bucket.rate",
           "        tokens = bucket.tokens", UDP_T + "/test_defences.py"),
    Mutant("udp: the global bucket (inlined) never refuses", UD + "_hot.py",
           "        if tokens < 1.0:\n            bucket.tokens = tokens",
           "        if False:\n            bucket.tokens = tokens", UDP_T + "/test_defences.py"),
    Mutant("settings: --token accepted on the command line", SK + "settings.py",
           "            if any(a == flag or a.startswith(flag + \"=\") for a in args):",
           "            if False:", CX_T + "/test_tls_and_cli.py -k token_flag"),
    Mutant("logs: no trace id", SK + "logs.py",
           "        if ctx.is_valid:", "        if False:", SK_T),
    Mutant("metrics: /readyz always ready", SK + "metrics.py",
           "            if self.readiness() if self.readiness is not None else self.ready:",
           "            if True:", SK_T),
    Mutant("aggregate: a replaced worker's counts dropped", SK + "aggregate.py",
           "                retired[key] = retired.get(key, 0.0) + value", "                pass",
           "tests/test_workers.py -k replaced"),
    Mutant("tracing: exporter never added", SK + "tracing.py",
           "        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))",
           "        pass", SK_T),
    Mutant("healthcheck: the port variable ignored", SK + "healthcheck.py",
           "    port = os.environ.get(args[0]) or args[1]", "    port = args[1]", SK_T),
    Mutant("cli: quit does not end", SK + "cli.py",
           '        if text.strip() == "quit":', "        if False:",
           "services/echo/tests/test_process.py -k client"),
    Mutant("accel: a compiled module taken for pure", SK + "accel.py",
           '    return "compiled" if path.endswith(tuple(EXTENSION_SUFFIXES)) else "pure"',
           '    return "compiled" if path.endswith(".py") else "pure"', SK_T + "/test_accel.py"),
    Mutant("service: --version ignored", SK + "service.py",
           '        if "--version" in args:', "        if False:",
           "services/echo/tests/test_process.py -k version"),
    Mutant("testing harness: ERROR logs ignored", SK + "testing.py",
           "        if record.levelno >= logging.ERROR or record.exc_info:",
           "        if False:", SK_T),
    Mutant("aggregate: gauges always summed", SK + "aggregate.py",
           '            mode = modes.get(family.name, "sum") if family.type == "gauge" else ""',
           '            mode = ""', SK_T + "/test_aggregate.py"),
    Mutant("aggregate: info metrics summed", SK + "aggregate.py",
           "                elif family.type in _ONCE:\n                    pass",
           "                elif False:\n                    pass", SK_T + "/test_aggregate.py"),
    Mutant("supervisor: no back-off after a crash", SK + "supervisor.py",
           "        wait, self.next_s = self.next_s, min(self.next_s * 2, BACKOFF_MAX_S)",
           "        wait = 0.0", SK_T + "/test_supervisor.py"),
    Mutant("supervisor: signals through Popen.send_signal (which reaps)", SK + "supervisor.py",
           "                if self._pidfd is not None:\n                    signal.pidfd_send_signal(self._pidfd, signum)\n                else:\n                    os.kill(self.proc.pid, signum)",
           "                self.proc.send_signal(signum)",
           SK_T + "/test_supervisor.py"),
    Mutant("worker: limits not divided", SK + "worker.py",
           "        return max(1, value // count)", "        return value", SK_T + "/test_worker.py"),
    Mutant("reload: SIGHUP not held at start", SK + "reload.py",
           "    return RELOAD_SIGNAL in signal.pthread_sigmask(signal.SIG_BLOCK, _SET)",
           "    return False", "tests/test_reload_signal.py"),
    Mutant("settings: a model-level error echoes its input", SK + "settings.py",
           '            if not err["loc"]:  # a model-level check: its input is every value at once',
           "            if False:", "tests/test_secrets.py"),
    Mutant("proxy: untrusted peers may send a header", SK + "proxy.py",
           "        if not ctx.policy.trusts(peer.address):", "        if False:",
           "services/echo/tests/test_proxy_header.py -k untrusted"),
    Mutant("hub: the client a PROXY header names is ignored", SK + "hub.py",
           "        peer = self._proxied.pop(transport, None) if transport is not None else None",
           "        peer = None",
           "services/echo/tests/test_proxy_header.py -k 'ipv4_mapped or one_64 or hands'"),
    # echo
    Mutant("echo: replies re-encoded from the read", EC + "protocol.py",
           "            self.transport.write(out)  # type: ignore[union-attr]\n            ctx.sent.n",
           "            self.transport.write(data)  # type: ignore[union-attr]\n            ctx.sent.n",
           "services/echo/tests/test_model.py -k framed_replies"),
    Mutant("echo: framed reads not in the handling histogram", EC + "protocol.py",
           "            ctx.handling.observe(perf_counter() - start)",
           "            pass", "services/echo/tests/test_echo.py"),
    # echo's C build (_hot.c, compiled in the copy): the same tests must see its mistakes
    Mutant("echo C: a whole read of frames not bounded", EC + "_hot.c",
           "        if (size > limit || size > end - pos - 4)", "        if (size > end - pos - 4)",
           "services/echo/tests/test_hostile.py -k whole_read"),
    Mutant("echo C: frames of a whole read not counted", EC + "_hot.c",
           "        self->frames->n += count;", "", "services/echo/tests/test_echo.py"),
    Mutant("echo C: the histogram's le bucket off by one", EC + "_hot.c",
           "    while (i < self->size && self->bounds[i] < value)",
           "    while (i < self->size && self->bounds[i] <= value)",
           "services/echo/tests/test_hot.py"),
    Mutant("echo: the drain does not see unread data", SK + "sockets.py",
           "    return _queue_bytes(transport, termios.FIONREAD)", "    return 0",
           "services/echo/tests/test_hostile.py -k sigterm"),
    Mutant("echo: data after FIN silently dropped", EC + "protocol.py",
           '            self._fail("unanswered", f"{n} bytes arrived after the server\'s end of stream")\n            self._close(lost=True)',
           "            pass", "services/echo/tests/test_hostile.py -k after_the_servers"),
    Mutant("echo settings: default per-source limit unbounded", EC + "settings.py",
           "class EchoSettings(TcpServiceSettings):",
           "class EchoSettings(TcpServiceSettings):\n    limit_connections_per_source: int = 10**9",
           "tests/test_readme.py"),
    Mutant("echo client: mismatch not detected", EC + "client.py",
           "        if reply != payload:", "        if False:",
           "services/echo/tests/test_process.py -k client"),
    # cmdexec
    Mutant("cmdexec: any kind accepted before AUTH", CX + "auth.py",
           "        if act(State.AUTHENTICATING, kind) is not Act.HANDLE:", "        if False:",
           CX_T + "/test_hostile.py"),
    Mutant("cmdexec: no write deadline", CX + "protocol.py",
           "            async with asyncio.timeout(self.svc.timeout_write_s):",
           "            async with asyncio.timeout(None):", CX_T + "/test_hostile.py -k reading"),
    Mutant("cmdexec: EXEC size unchecked", CX + "protocol.py",
           "        if frame[:1] == _KIND_BYTE[Kind.EXEC] and len(frame) > self.svc.limit_exec_bytes:",
           "        if False:", CX_T + "/test_security.py"),
    Mutant("cmdexec: lax types", CX + "messages.py",
           "strict=True, allow_inf_nan=False)", "strict=False, allow_inf_nan=True)",
           CX_T + "/test_security.py"),
    Mutant("cmdexec: argument patterns not applied", CX + "policy.py",
           "                if not pattern.fullmatch(arg):", "                if False:",
           CX_T + "/test_security.py"),
    Mutant("cmdexec identities: sources not checked", CX + "identities.py",
           "        if not any(ip in net for net in self.sources):", "        if False:",
           CX_T + "/test_identities.py -k table"),
    Mutant("cmdexec identities: a key given twice taken", CX + "identities.py",
           "            if key in seen:", "            if False:",
           CX_T + "/test_identities.py -k twice"),
    Mutant("cmdexec: a removed credential still valid", CX + "protocol.py",
           "        if identity is None or self.credential not in identity.credentials:",
           "        if identity is None:", CX_T + "/test_identities.py -k rotation"),
    Mutant("cmdexec: reload loses the TLS files", CX + "config.py",
           "        tls, tls_sha256 = server_tls(settings)\n    except",
           "        tls, tls_sha256 = None, ''\n    except", CX_T + "/test_identities.py -k certificate"),
    Mutant("cmdexec: no exec wrapper", CX + "runner.py",
           '            if found:\n                self.wrapper =', '            if False:\n                self.wrapper =',
           CX_T + "/test_hostile.py -k limits"),
    Mutant("cmdexec: output cap does not end", CX + "runner.py",
           '                if self.limits.limit_output_action == "end":', "                if False:",
           CX_T + "/test_runs.py -k output_cap"),
    Mutant("cmdexec: escapes left alone", CX + "containment.py",
           "            if session == self.own_session or session in self.live:",
           "            if True:", CX_T + "/test_hostile.py -k setsid"),
    Mutant("cmdexec errors: forbidden closes", CX + "errors.py",
           "    code = ErrorCode.FORBIDDEN\n    closes = False",
           "    code = ErrorCode.FORBIDDEN\n    closes = True", CX_T + "/test_security.py"),
    Mutant("cmdexec settings: shell on by default", CX + "settings.py",
           "        False, description=\"Allow EXEC with shell=true",
           "        True, description=\"Allow EXEC with shell=true", CX_T + "/test_security.py"),
    Mutant("cmdexec main: root not refused", CX + "__main__.py",
           "    if os.geteuid() == 0 and not settings.allow_root:", "    if False:",
           CX_T + "/test_tls_and_cli.py -k root"),
    Mutant("cmdexec client: timeout status lost", CX + "client.py",
           "    if result.timed_out:\n        return EXIT_TIMEOUT", "    if False:\n        return EXIT_TIMEOUT",
           CX_T + "/test_runs.py"),
    Mutant("cmdexec auth: the service-wide budget locks everyone out", CX + "auth.py",
           "        if self.per_source.ready(source, now):",
           "        if self.per_source.ready(source, now) and self.overall.ready(now):",
           CX_T + "/test_login_limiter.py"),
    Mutant("cmdexec auth: weak policy tokens accepted", CX + "context.py",
           "        if self.allow_weak_tokens:", "        if True:", CX_T + "/test_tokens.py"),
    Mutant("cmdexec states: EXEC taken while a command runs", CX + "states.py",
           "    State.RUNNING: {Kind.STDIN: Act.HANDLE,",
           "    State.RUNNING: {Kind.EXEC: Act.HANDLE, Kind.STDIN: Act.HANDLE,",
           CX_T + "/test_hostile.py -k while_a_command_runs"),
    Mutant("cmdexec context: no per-identity run limit", CX + "context.py",
           "        if self.running_by_identity.get(identity.name, 0) >= identity.limit_runs:",
           "        if False:", CX_T + "/test_identities.py"),
    # udp
    Mutant("udp: our own answer coming back is answered", UD + "defences.py",
           "        return when is not None and now - when < self.window_s",
           "        return False", UDP_T + "/test_loops.py"),
    Mutant("udp: our own answer coming back is answered (the inlined check)", UD + "_hot.py",
           "        if when is not None and now - when < self._window:", "        if False:",
           UDP_T + "/test_loops.py"),
    Mutant("udp: answers not remembered by the inlined check", UD + "_hot.py",
           "            answers[key] = now\n        else:\n            self.loop.answered(key, now)",
           "            pass\n        else:\n            pass", UDP_T + "/test_loops.py"),
    Mutant("udp: answers counted at scrape time go down", UD + "protocol.py",
           "max(self.last[0], now[0]), max(self.last[1], now[1])", "now",
           UDP_T + "/test_defences.py -k answers"),
    Mutant("udp: answers from the routing table's address", UD + "pktinfo.py",
           "            self._reply = reply", "            self._reply = []",
           UDP_T + "/test_loops.py -k address_that_was_asked"),
    Mutant("udp: one local address's answers leave from another's", UD + "pktinfo.py",
           "                reply = replies.get(ancillary[0])",
           "                reply = next(iter(replies.values()), None)",
           UDP_T + "/test_loops.py -k address_that_was_asked"),
    Mutant("udp: privileged source ports answered", UD + "_hot.py",
           "        if port < self.min_port:", "        if False:", UDP_T),
    # udp's C build (_hot.c, compiled in the copy)
    Mutant("udp C: a source's bucket never refills", UD + "_hot.c",
           "    double tokens = bucket->tokens + (now - bucket->stamp) * bucket->rate;",
           "    double tokens = bucket->tokens;", UDP_T + "/test_hot.py"),
    Mutant("udp C: our own answer coming back is answered", UD + "_hot.c",
           "    if (answers->keys[slot] == k && t - answers->whens[slot] < self->window) {",
           "    if (0) {", UDP_T + "/test_loops.py"),
    Mutant("udp C: answers not remembered in the loop table", UD + "_hot.c",
           "        if (table_put(answers, k, t) < 0)\n            goto done;",
           "        (void)0;", UDP_T + "/test_loops.py"),
    Mutant("udp C: the loop table's deletion leaves entries unreachable", UD + "_hot.c",
           "        if (((j - table_home(t, t->keys[j])) & t->mask) >= ((j - i) & t->mask)) {",
           "        if (0) {", UDP_T + "/test_hot.py -k loop_table"),
    Mutant("udp C: the loop table's deletion moves entries before their home", UD + "_hot.c",
           "        if (((j - table_home(t, t->keys[j])) & t->mask) >= ((j - i) & t->mask)) {",
           "        if (1) {", UDP_T + "/test_hot.py -k loop_table"),
    Mutant("udp C: the transport's address cache blind to the port", UD + "_hot.c",
           "    if (slot->tuple != NULL && slot->len == len && memcmp(&slot->addr, a, len) == 0)",
           "    if (slot->tuple != NULL && slot->addr.in.sin_addr.s_addr == a->in.sin_addr.s_addr)",
           UDP_T + "/test_transport.py"),
    Mutant("udp C: the transport answers a wildcard bind from any address", UD + "_hot.c",
           "    if (self->current >= 0 && self->replylen) { /* during datagram_received, as pktinfo.py */",
           "    if (0) {", UDP_T + "/test_loops.py -k asked"),
    Mutant("udp C: the transport drops a batch's rest when the protocol raises", UD + "_hot.c",
           "            else\n                stop = keep_first(&failed, self->protocol);\n        }",
           "            else {\n                stop = keep_first(&failed, self->protocol);\n                break;\n            }\n        }",
           UDP_T + "/test_transport.py"),
    Mutant("udp C: the transport goes on handing over a batch after close", UD + "_hot.c",
           "        for (int i = 0; i < got && !self->closing; i++) {",
           "        for (int i = 0; i < got; i++) {", UDP_T + "/test_transport.py"),
    Mutant("udp C: the transport counts an oversize datagram at its cut length", UD + "_hot.c",
           "    if (len > self->iov[i].iov_len && self->direct) /* larger than the largest answered */",
           "    if (0)", UDP_T + "/test_transport.py"),
    Mutant("udp C: the transport holds an interrupt until the batch ends", UD + "_hot.c",
           "    return !PyErr_GivenExceptionMatches(first->type, PyExc_Exception);",
           "    return 0;", UDP_T + "/test_transport.py"),
    Mutant("udp C: the monotonic clock read in microseconds", UD + "_hot.c",
           "        t = (double)((int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec) / 1e9;",
           "        t = (double)((int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec) / 1e6;",
           UDP_T + "/test_hot.py -k monotonic"),
    Mutant("udp C: privileged source ports answered", UD + "_hot.c",
           "        low = overflow ? overflow < 0 : p < self->min_port;", "        low = 0;",
           UDP_T),
    Mutant("udp C: the loop key blind to the payload's length", UD + "_hot.c",
           "    SIP_ABSORB((uint64_t)n);", "", UDP_T + "/test_hot.py -k loop_keys"),
    Mutant("udp C: the loop key blind to a payload's last bytes", UD + "_hot.c",
           "        memcpy(tail, p, len % 16);", "", UDP_T + "/test_hot.py -k loop_keys"),
    Mutant("udp C: the loop key blind to all but a payload's first 1 KiB", UD + "_hot.c",
           "    for (Py_ssize_t at = 0; at < n; at += NH_BLOCK) {",
           "    for (Py_ssize_t at = 0; at < n && at < NH_BLOCK; at += NH_BLOCK) {",
           UDP_T + "/test_hot.py -k loop_keys"),
    Mutant("udp C: the loop key's secret fixed", UD + "_hot.c",
           "    memcpy(nh_key, r, sizeof nh_key);\n    sip_k0 = load64(r + sizeof nh_key);\n"
           "    sip_k1 = load64(r + sizeof nh_key + 8);", "    (void)r;", UDP_T + "/test_hot.py -k afresh"),
    Mutant("udp C: the loop key drawn again when the module is set up again", UD + "_hot.c",
           "    if (drawn)\n        return 0;\n", "", UDP_T + "/test_hot.py -k loaded_again"),
    Mutant("udp C: a bytes subclass keyed as Python hashes it", UD + "_hot.c",
           "    if (PyBytes_Check(data)) {", "    if (PyBytes_CheckExact(data)) {",
           UDP_T + "/test_hot.py -k subclass"),
    Mutant("udp: broadcast sources answered", UD + "defences.py",
           "    return addr.is_multicast or addr.is_unspecified", "    return False", UDP_T),
    Mutant("udp: kernel drops not found", UD + "kernel.py",
           "                    if len(fields) > 12 and fields[9] == wanted:", "                    if False:",
           UDP_T + "/test_udp.py -k burst"),
    Mutant("udp settings: small receive buffer", UD + "settings.py",
           "        4 * 1024 * 1024, ge=4096,", "        64 * 1024, ge=4096,",
           UDP_T + "/test_udp.py -k burst"),
    Mutant("udp client: a lost datagram not reported", UD + "client.py",
           "        if reply is None:\n            failures += 1",
           "        if reply is None:\n            failures += 0", UDP_T),
    Mutant("memory: a connection does not stop the trim", SK + "memory.py",
           "    def busy(self) -> None:\n        if self._handle is not None:",
           "    def busy(self) -> None:\n        if False:", SK_T + "/test_memory.py"),
    # probe
    Mutant("probe tracker: RFC 4737 next-expected never advances", PR + "tracker.py",
           "            self._next_expected = seq + 1", "            pass", PROBE_T),
    Mutant("probe tracker: a late reply counted as received", PR + "tracker.py",
           "            if state == _LOST:", "            if False:", PROBE_T),
    Mutant("probe wire: another session's probes taken", PR + "wire.py",
           "    if got_nonce != nonce:", "    if False:", PROBE_T),
    Mutant("probe udp: replies from anywhere taken", PR + "udp.py",
           "        if (addr[0], addr[1]) != self._key:", "        if False:", PROBE_T),
    Mutant("probe pacer: the budget not taken", PR + "runners.py",
           "        if self.budget is None or self.budget.take(time.monotonic()):",
           "        if True:", PROBE_T + "/test_pacer.py"),
    Mutant("probe monitor: a target that left keeps its series", PR + "monitor.py",
           "        gone = [e for e in self.tasks if e not in wanted]", "        gone = []",
           "tests/test_probe_service.py -k follow"),
    Mutant("probe monitor: no limit on endpoints", PR + "monitor.py",
           "        self.dropped = max(0, len(found) - limit)", "        self.dropped = 0",
           "tests/test_probe_service.py -k limit"),
    Mutant("probe /probe: any address allowed", PR + "targets.py",
           "    return bool(found) and all(", "    return True or all(",
           "tests/test_probe_service.py -k refuses"),
    Mutant("probe tcp-framed: a clean end between probes costs a probe", PR + "runners.py",
           "            if streams is not None and streams[0].at_eof():", "            if False:",
           PROBE_T + "/test_tcp_framed.py"),
    Mutant("probe srv: hosts missing from the additional section dropped", PR + "targets.py",
           "        missing = sorted({target for target, _ in records} - set(addresses))",
           "        missing = []", PROBE_T + "/test_srv.py"),
    Mutant("probe scheduler: a probe goes before its window opens", PR + "runners.py",
           "                if entry.earliest <= now:", "                if True:",
           PROBE_T + "/test_scheduler.py"),
    Mutant("probe cli: total loss exits 0", PR + "cli.py",
           "    return 0 if summary.received else 1", "    return 0",
           "tests/test_probe.py -k dead_target"),
]  # fmt: skip


def compile_extension(source: Path) -> str:
    """Build ``source`` into an extension module beside it, as tools/hatch_cext.py would (the same
    compiler flags of this Python); "" when it built, else the compiler's complaint."""
    paths, var = sysconfig.get_paths(), sysconfig.get_config_var
    out = source.with_name(source.stem + str(var("EXT_SUFFIX")))
    res = subprocess.run(
        [os.environ.get("CC", "cc"), "-O2", "-fwrapv", "-ffp-contract=off", "-shared", "-fPIC",
         "-Wall", f"-I{paths['include']}",
         str(source), "-o", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    return "" if res.returncode == 0 else res.stderr.strip()[-500:]


def run(mutant: Mutant, workdir: Path) -> tuple[bool, float, str]:
    """Apply ``mutant`` to a fresh copy of the sources and run its tests: (killed, s, tail)."""
    tree = workdir / "src"
    if tree.exists():
        shutil.rmtree(tree)
    for src in SRC:
        # not what `make accel` compiled: an extension module would shadow the mutated .py
        shutil.copytree(ROOT / src, tree / src, ignore=shutil.ignore_patterns("*.so"))
    target = tree / mutant.path
    text = target.read_text()
    if text.count(mutant.old) != 1:
        return False, 0.0, f"the line to mutate is not found once in {mutant.path}"
    target.write_text(text.replace(mutant.old, mutant.new))
    if target.suffix == ".c":  # a C build's source: compile it where Python imports it first
        built = compile_extension(target)
        if built:
            return False, 0.0, f"the mutated {mutant.path} does not compile: {built}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(tree / s) for s in SRC),
           "PYTHONDONTWRITEBYTECODE": "1"}  # fmt: skip
    started = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
         "-p", "no:randomly", *mutant.tests.split()],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    tail = (res.stdout.strip().splitlines() or [""])[-1]
    return res.returncode != 0, time.monotonic() - started, tail


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", help="run the mutants whose name contains this")
    args = p.parse_args()
    chosen = [m for m in MUTANTS if not args.only or args.only in m.name]
    lines = ["| mutant | module | killed | tests | s |", "|---|---|---|---|---|"]
    survivors = 0
    with tempfile.TemporaryDirectory(prefix="wirekit-mutants-") as tmp:
        for mutant in chosen:
            killed, seconds, tail = run(mutant, Path(tmp))
            survivors += not killed
            lines.append(f"| {mutant.name} | `{mutant.path.rsplit('/', 1)[1]}` | "
                         f"{'yes' if killed else '**no**: ' + tail} | `{mutant.tests}` | "
                         f"{seconds:.0f} |")  # fmt: skip
            print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))
    print(f"\n{len(chosen) - survivors} of {len(chosen)} mutants killed.")
    raise SystemExit(1 if survivors else 0)


if __name__ == "__main__":
    main()
