import cProfile, pstats, io, os, time
import numpy as np
from numba import cuda
from gpucrypt.backends import get_backend
g = get_backend("gpu")
n = 1 << 20
out = os.environ["OUT"]
src = cuda.to_device(np.frombuffer(os.urandom(n), np.uint8)); dst = cuda.device_array(n, np.uint8)
key, nonce = os.urandom(32), os.urandom(12)
for label, call in (("xor", lambda: g.xor_keystream_device("chacha20", key, bytes(4) + nonce, 0, src, dst)),
                    ("seal", lambda: g.seal_batch("chacha20-poly1305", [key], [nonce], [src], [b""], [dst]))):
    for _ in range(5): call()
    cuda.synchronize(); t = time.perf_counter()
    for _ in range(50): call()
    cuda.synchronize()
    print(label, "per call ms", (time.perf_counter() - t) / 50 * 1e3, flush=True)
    pr = cProfile.Profile(); pr.enable()
    for _ in range(50): call()
    cuda.synchronize(); pr.disable()
    s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(45)
    open(f"{out}/prof-{label}.txt", "w").write(s.getvalue())
    print("\n".join(l[:150] for l in s.getvalue().splitlines()[:60]))
