# The container's default configuration (mount your own over /etc/wasisup/wasisup.conf.py).
# See config/wasisup.conf.py in the repository for every setting.
import os
from urllib.parse import urlsplit

_upstream = os.environ.get("UPSTREAM", "http://127.0.0.1:9000")

component = "/app/proxy.cwasm"
bind = ["0.0.0.0:8080"]
metrics_bind = "0.0.0.0:9090"
guest_env = {"UPSTREAM": _upstream}
allow_outbound = [urlsplit(_upstream).netloc]  # the guest reaches its upstream, nothing else
graceful_timeout = 30
errorlog = "-"
accesslog = "-"
