# The RPC between the trusted harness and the untrusted worker (prepended to both scripts).
#
# Values cross as JSON in a tagged encoding: JSON scalars stand for themselves (floats keep
# NaN/Infinity), every other value is a JSON array whose first item is a tag. Decoding builds only
# plain builtin/stdlib values from plain JSON, so nothing the other side sends can run code here
# (never pickle: unpickling is code execution). Callables and iterators are not copied: they are
# exported under an id, and the other side calls them (or pulls their next item) through the same
# pipe, so the harness can hand a test's lambda to the solution and a generator can be infinite.
#
# Messages, one JSON array a line:
#   ["call", id, [args], {kwargs}]  -> ["ok", result, [[i, arg]...], [[name, kwarg]...]]
#   ["next", id]                    -> ["ok", item]     (or ["exc", "StopIteration", ""])
#   any request                     -> ["exc", type_name, message]
# The write-backs in a call's reply are the mutable arguments the callee changed in place.

import builtins
import collections
import json
import os
import sys
import types

# decimal, fractions and datetime cost a noticeable part of a run's start-up, so they are imported
# only when a value needs them: a value of one of their types cannot exist before its module was
# imported, so encoding looks them up in sys.modules and decoding imports on demand.


def _stdlib_type(module, name):
    return getattr(sys.modules.get(module), name, None)


class ProtocolError(Exception):
    """The other side sent something that is not a valid message or value."""


class PeerGone(Exception):
    """The other side closed its pipe (it exited or was killed)."""


class Unencodable(TypeError):
    """A value with no plain-data encoding (an object with its own __eq__, say)."""


# Exact types only: a subclass (an int whose __eq__ always says yes) is not the builtin.
_MUTABLE = (list, dict, set, bytearray, collections.deque, collections.Counter,
            collections.OrderedDict, collections.defaultdict)
_REMOTE_EXC = {}


def remote_exception(name, message):
    """The exception to raise for an ["exc", name, message] reply: the builtin of that name, else
    a plain Exception subclass carrying the name (so `except ValueError` keeps working)."""
    if not isinstance(name, str) or not name.isidentifier():
        return ProtocolError("bad exception name")
    message = message if isinstance(message, str) else ""
    t = getattr(builtins, name, None)
    if not (isinstance(t, type) and issubclass(t, BaseException)):
        t = _REMOTE_EXC.get(name)
        if t is None:
            t = _REMOTE_EXC[name] = type(name, (Exception,), {})
    try:
        return t(message)
    except Exception:
        # Builtins with required arguments (UnicodeDecodeError, ...): the name still shows.
        return Exception(name + ": " + message)


class Peer:
    def __init__(self, rfd, wfd):
        self.r = os.fdopen(rfd, "rb", buffering=1 << 16)
        self.w = os.fdopen(wfd, "wb", buffering=1 << 16)
        self.exports = {}
        self.next_id = 0

    # ---- values ----
    def export(self, obj):
        self.next_id += 1
        self.exports[self.next_id] = obj
        return self.next_id

    def encode(self, v):
        t = type(v)
        if v is None or t is bool or t is int or t is float or t is str:
            return v
        if t is list:
            return ["l", [self.encode(x) for x in v]]
        if t is tuple:
            return ["t", [self.encode(x) for x in v]]
        if t is dict or t is collections.defaultdict:
            return ["d", [[self.encode(k), self.encode(x)] for k, x in v.items()]]
        if t is set:
            return ["s", [self.encode(x) for x in v]]
        if t is frozenset:
            return ["fs", [self.encode(x) for x in v]]
        if t is bytes:
            return ["b", v.hex()]
        if t is bytearray:
            return ["ba", v.hex()]
        if t is complex:
            return ["c", v.real, v.imag]
        if t is collections.deque:
            return ["dq", [self.encode(x) for x in v], v.maxlen]
        if t is collections.Counter:
            return ["ctr", [[self.encode(k), self.encode(x)] for k, x in v.items()]]
        if t is collections.OrderedDict:
            return ["od", [[self.encode(k), self.encode(x)] for k, x in v.items()]]
        if t is _stdlib_type("decimal", "Decimal"):
            return ["dec", str(v)]
        if t is _stdlib_type("fractions", "Fraction"):
            return ["fr", str(v.numerator), str(v.denominator)]
        if t is _stdlib_type("datetime", "datetime"):
            return ["dt", v.isoformat()]
        if t is _stdlib_type("datetime", "date"):
            return ["date", v.isoformat()]
        if t is _stdlib_type("datetime", "time"):
            return ["time", v.isoformat()]
        if t is _stdlib_type("datetime", "timedelta"):
            return ["td", v.days, v.seconds, v.microseconds]
        if t is range:
            return ["range", v.start, v.stop, v.step]
        if t is types.GeneratorType or (hasattr(t, "__next__") and hasattr(t, "__iter__")):
            return ["gen", self.export(v)]
        if callable(v):
            return ["fn", self.export(v)]
        raise Unencodable("cannot pass a value of type %s between harness and solution" % t.__name__)

    def decode(self, j):
        if j is None or type(j) in (bool, int, float, str):
            return j
        if type(j) is not list or not j or type(j[0]) is not str:
            raise ProtocolError("bad value")
        tag, a = j[0], j[1:]
        try:
            if tag == "l":
                return [self.decode(x) for x in a[0]]
            if tag == "t":
                return tuple(self.decode(x) for x in a[0])
            if tag in ("d", "ctr", "od"):
                pairs = [(self.decode(k), self.decode(x)) for k, x in a[0]]
                if tag == "ctr":
                    return collections.Counter(dict(pairs))  # Counter(pairs) would count them
                return (dict if tag == "d" else collections.OrderedDict)(pairs)
            if tag == "s":
                return {self.decode(x) for x in a[0]}
            if tag == "fs":
                return frozenset(self.decode(x) for x in a[0])
            if tag == "b":
                return bytes.fromhex(a[0])
            if tag == "ba":
                return bytearray.fromhex(a[0])
            if tag == "c":
                return complex(float(a[0]), float(a[1]))
            if tag == "dq":
                maxlen = a[1]
                if maxlen is not None and type(maxlen) is not int:
                    raise ProtocolError("bad deque")
                return collections.deque((self.decode(x) for x in a[0]), maxlen)
            if tag == "dec":
                import decimal
                return decimal.Decimal(_s(a[0]))
            if tag == "fr":
                import fractions
                return fractions.Fraction(int(_s(a[0])), int(_s(a[1])))
            if tag in ("dt", "date", "time"):
                import datetime
                cls = {"dt": datetime.datetime, "date": datetime.date, "time": datetime.time}[tag]
                return cls.fromisoformat(_s(a[0]))
            if tag == "td":
                import datetime
                return datetime.timedelta(days=_i(a[0]), seconds=_i(a[1]), microseconds=_i(a[2]))
            if tag == "range":
                return range(_i(a[0]), _i(a[1]), _i(a[2]))
            if tag == "gen":
                return self._remote_iter(_i(a[0]))
            if tag == "fn":
                return self._remote_fn(_i(a[0]))
        except ProtocolError:
            raise
        except (ArithmeticError, ValueError, TypeError, IndexError, KeyError,
                RecursionError) as e:  # decimal.InvalidOperation is an ArithmeticError
            raise ProtocolError("bad %r value: %s" % (tag, type(e).__name__)) from None
        raise ProtocolError("unknown tag %r" % tag)

    def _remote_fn(self, ident):
        peer = self

        def remote(*args, **kwargs):
            return peer.call(ident, args, kwargs)

        remote.__name__ = remote.__qualname__ = str(ident)
        return remote

    def _remote_iter(self, ident):
        # Lazy: one round trip per item, so infinite generators work.
        while True:
            try:
                reply = self.request(["next", ident])
            except StopIteration:
                return
            yield self.decode(reply[1])

    # ---- messages ----
    def send(self, msg):
        self.w.write(json.dumps(msg, separators=(",", ":")).encode() + b"\n")
        self.w.flush()

    def recv(self):
        line = self.r.readline()
        if not line:
            raise PeerGone("the other side of the RPC is gone")
        try:
            m = json.loads(line)
        except (ValueError, RecursionError):
            raise ProtocolError("bad message") from None
        if type(m) is not list or not m or type(m[0]) is not str:
            raise ProtocolError("bad message")
        return m

    def request(self, msg):
        """Send a request and serve the other side's requests until our reply arrives."""
        self.send(msg)
        while True:
            m = self.recv()
            if m[0] == "ok" and len(m) >= 2:
                return m
            if m[0] == "exc" and len(m) == 3:
                raise remote_exception(m[1], m[2])
            self.serve(m)

    def call(self, ident, args, kwargs):
        sent = [self.encode(a) for a in args]
        sent_kw = {k: self.encode(v) for k, v in kwargs.items()}
        reply = self.request(["call", ident, sent, sent_kw])
        result = self.decode(reply[1])
        # Write back in-place changes of mutable arguments (`sort_in_place(a); assert a == ...`).
        backs = reply[2:4] if len(reply) >= 4 else [[], []]
        for pairs, target in ((backs[0], args), (backs[1], kwargs)):
            if type(pairs) is not list:
                raise ProtocolError("bad write-back")
            for pair in pairs:
                if type(pair) is not list or len(pair) != 2 or pair[0] not in _keys(target):
                    raise ProtocolError("bad write-back")
                write_back(target[pair[0]], self.decode(pair[1]))
        return result

    def serve(self, m):
        """Answer one request from the other side."""
        try:
            if m[0] == "call" and len(m) == 4 and type(m[2]) is list and type(m[3]) is dict:
                fn = self.exports.get(m[1]) if type(m[1]) is int else self.named(m[1])
                if fn is None:
                    raise ProtocolError("no such function")
                args = [self.decode(a) for a in m[2]]
                kwargs = {str(k): self.decode(v) for k, v in m[3].items()}
                result = fn(*args, **kwargs)
                reply = ["ok", self.encode(result), _changed(self, m[2], enumerate(args)),
                         _changed(self, m[3], kwargs.items())]
            elif m[0] == "next" and len(m) == 2 and type(m[1]) is int and m[1] in self.exports:
                reply = ["ok", self.encode(next(self.exports[m[1]]))]
            else:
                raise ProtocolError("bad request")
        except BaseException as e:  # noqa: B036 -- sys.exit() in the callee is its exception too
            if isinstance(e, (PeerGone, KeyboardInterrupt)):
                raise
            reply = ["exc", type(e).__name__, _text(e)]
        self.send(reply)

    def named(self, name):
        """A function exported by name (the worker exports the solution's functions)."""
        return None


def _changed(peer, sent, items):
    out = []
    for key, value in items:
        if type(value) in _MUTABLE:
            after = peer.encode(value)
            before = sent[key]
            if after != before:
                out.append([key, after])
    return out


def _keys(target):
    return range(len(target)) if type(target) in (list, tuple) else target.keys()


def write_back(orig, new):
    """Make `orig` equal `new` in place, recursing into same-shaped lists so rows held elsewhere
    see the change too."""
    t = type(orig)
    if t is list and type(new) is list:
        if len(orig) == len(new):
            for i, x in enumerate(new):
                if type(orig[i]) in _MUTABLE and type(orig[i]) is type(x):
                    write_back(orig[i], x)
                else:
                    orig[i] = x
        else:
            orig[:] = new
    elif t is bytearray and type(new) is bytearray:
        orig[:] = new
    elif t in (dict, collections.defaultdict, collections.Counter, collections.OrderedDict) \
            and isinstance(new, dict):
        orig.clear()
        orig.update(new)
    elif t is set and type(new) is set:
        orig.clear()
        orig.update(new)
    elif t is collections.deque and type(new) is collections.deque:
        orig.clear()
        orig.extend(new)


def _s(v):
    if type(v) is not str:
        raise ProtocolError("expected a string")
    return v


def _i(v):
    if type(v) is not int:
        raise ProtocolError("expected an int")
    return v


def _text(e):
    try:
        return str(e)[:2000]
    except BaseException:  # noqa: B036 -- a hostile __str__ must not take the peer down
        return ""
