#!/bin/sh
# Stand-in for nginx: busybox httpd serving a static page on :80 (the port the real image listens on).
mkdir -p /srv/www && echo '<h1>Welcome to nginx!</h1>' >/srv/www/index.html
echo "nginx: listening on :80"
exec httpd -f -p 80 -h /srv/www
