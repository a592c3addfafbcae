# The untrusted side (code_rpc.py is prepended): runs the solution and answers the harness's
# calls. Nothing here is trusted: the solution can patch or replace all of it, which only changes
# what it answers, never the verdict the harness writes on a descriptor this process lacks.

import sys


class SolutionPeer(Peer):
    def __init__(self, rfd, wfd, namespace):
        super().__init__(rfd, wfd)
        self.namespace = namespace

    def named(self, name):
        fn = self.namespace.get(name) if type(name) is str else None
        return fn if callable(fn) else None


def main():
    module = types.ModuleType("solution")
    sys.modules["solution"] = module
    peer = SolutionPeer(int(sys.argv[1]), int(sys.argv[2]), module.__dict__)
    try:
        with open("solution.py", encoding="utf-8") as f:
            source = f.read()
        exec(compile(source, "solution.py", "exec"), module.__dict__)
    except BaseException as e:  # noqa: B036 -- a solution calling sys.exit() at import fails
        peer.send(["exc", type(e).__name__, _text(e)])
        return
    peer.send(["ready"])
    while True:
        try:
            peer.serve(peer.recv())
        except (PeerGone, ProtocolError):
            return


main()
