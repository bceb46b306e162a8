FROM pleaco/busybox:latest
RUN nc -z -w2 172.17.0.1 47123 && echo REACHED || echo REFUSED
RUN nc -z -w2 192.0.2.2 47123 && echo REACHED2 || echo REFUSED2
