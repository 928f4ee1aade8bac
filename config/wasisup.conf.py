# wasisup configuration: a Python file whose top-level names are settings (`wasisup -c FILE`).
# Precedence, lowest first: defaults, this file, $WASISUP_CMD_ARGS, the command line.
# Every setting is listed with its default; uncomment to change one.

# -- what to serve
component = "build/proxy.wasm"      # .wasm (compiled once, cached) or .cwasm (`wasisup compile`)
guest_env = {"UPSTREAM": "http://127.0.0.1:9000"}   # the guest's environment (--env K=V)
# max_instance_reuse = 1            # requests per guest instance; 1 = fresh instance each time

# -- where and how much
bind = ["127.0.0.1:8080"]           # HOST:PORT or unix:PATH, several allowed (-b)
# workers = 1                       # processes (-w); default $WEB_CONCURRENCY or 1
# threads = 1                       # event loops per worker (threads running guests in parallel)
# max_concurrent_requests = 1000    # requests a worker holds in flight; more wait their turn
# backlog = 2048                    # pending connections per listening socket
# keepalive = 2                     # seconds an idle keep-alive connection is kept
# worker_connections = 1000         # open client connections per worker; more wait in the backlog

# -- supervision
# timeout = 30                      # a worker silent this long is killed and replaced
# graceful_timeout = 30             # seconds in-flight requests get on TERM, QUIT or HUP
# max_requests = 0                  # restart a worker after this many requests (0: never)
# max_requests_jitter = 0           # plus a random 0..N, so workers don't restart together
# pidfile = None                    # write the master's pid here (-p)
# proc_name = None                  # process title: "wasisup: master [NAME]" (-n)
# worker_tmp_dir = "/dev/shm"       # heartbeat files (/dev/shm if it exists)

# -- limits
# request_timeout = 0               # the guest's deadline per request, seconds -> 504
# compute_timeout = 0               # wasm running this long without waiting for I/O -> 504 (0: timeout)
# max_memory = 0                    # a guest instance's linear memory cap, e.g. "256M" -> 500
# limit_request_line = 4094         # bytes -> 414
# limit_request_fields = 100        # header count -> 431
# limit_request_field_size = 8190   # bytes per header -> 431
# limit_request_body = 0            # bytes, e.g. "10M" -> 413 (0: unlimited)
# header_timeout = 20               # seconds for a whole request head, from its first byte -> 408
# min_data_rate = 240               # bytes/s a client must send a body or read a response at
# data_rate_grace = 5               #   ... measured over windows of this many seconds (0 rate: off)
# allow_outbound = []               # HOST or HOST:PORT the guest may call, e.g. ["*.example.com"];
#                                   # empty: any host, loopback included (a startup warning)

# -- observability
# loglevel = "info"                 # debug, info, warning, error, critical
# errorlog = "-"                    # the log ("-": stderr); guest stdout/stderr go here too
# accesslog = None                  # one line per request ("-": stdout)
# metrics_bind = "127.0.0.1:9090"   # Prometheus /metrics, served by the master
# trace_context = True              # W3C traceparent: read inbound, a span id of our own outbound
#                                   # (spans exported with OTEL_EXPORTER_OTLP_ENDPOINT and wasisup[otel])
