#!/bin/sh
# /cgi-bin/slow answers after a second; /healthz at once.
mkdir -p /www/cgi-bin
echo ok > /www/healthz
printf '#!/bin/sh\nsleep 1\nprintf "Content-Type: text/plain\\r\\n\\r\\n"\n' > /www/cgi-bin/slow
echo 'echo "slow from $(hostname)"' >> /www/cgi-bin/slow
chmod +x /www/cgi-bin/slow
exec httpd -f -p 8080 -h /www
