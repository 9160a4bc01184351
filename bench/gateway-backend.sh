# Sourced by bench/gateway.sh and bench/gateway-ab.sh: the backend both
# measure against, a site whose process is an nginx worker pinned to CPU 1,
# answering 200 from memory.
#
#   deploy_backend COMMONS_BINARY WORK_DIR NGINX [NAME]
#
# deploys site NAME ("bench" by default); prints its port.
deploy_backend() {
  local B=$1 name=${4:-bench} nginx=$3
  local dir=$2/site-$name
  mkdir -p "$dir"
  cat > "$dir/backend.conf.in" <<'CONF'
worker_processes 1; daemon off; user root; master_process off;
pid @DIR@/backend.pid; error_log @DIR@/backend.err;
events { worker_connections 30000; }
http {
  access_log off; keepalive_requests 1000000; keepalive_timeout 300s;
  client_body_temp_path @DIR@; proxy_temp_path @DIR@; fastcgi_temp_path @DIR@;
  uwsgi_temp_path @DIR@; scgi_temp_path @DIR@;
  server { listen 127.0.0.1:@PORT@ backlog=4096;
    location / { default_type text/plain; return 200 "hello from the backend\n"; } }
}
CONF
  cat > "$dir/commons.yaml" <<YAML
name: $name
components:
  backend:
    process: "sed -e \"s/@PORT@/\$PORT/g\" -e \"s#@DIR@#\$COMMONS_DATA_DIR#g\" backend.conf.in > \$COMMONS_DATA_DIR/backend.conf && exec taskset -c 1 $nginx -c \$COMMONS_DATA_DIR/backend.conf"
    health: { http: "/", interval: 20ms }
YAML
  "$B" deploy "$dir" >/dev/null 2>&1
  "$B" status "$name" --json | python3 -c 'import json,sys; print(next(c["port"] for c in json.load(sys.stdin)["components"] if c["name"]=="backend"))'
}
