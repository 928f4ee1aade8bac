# wasisup's configuration in the cluster (mounted at /etc/wasisup/wasisup.conf.py).
# Workers follow the container's CPU limit (WEB_CONCURRENCY) unless `workers` is set here.
import os
from urllib.parse import urlsplit

_upstream = os.environ.get("UPSTREAM", "http://upstream:80")

component = "/app/proxy.cwasm"
bind = ["0.0.0.0:8080"]
metrics_bind = "0.0.0.0:9090"
guest_env = {"UPSTREAM": _upstream}
allow_outbound = [urlsplit(_upstream).netloc]  # the guest reaches its upstream, nothing else
graceful_timeout = 30          # terminationGracePeriodSeconds = this + preStop pause + margin
request_timeout = 30
max_memory = "512M"
errorlog = "-"
accesslog = "-"
