/*
 * rhizos-probe: the workload of the Docker backend tests. A static binary, the only file of the
 * test image (`FROM scratch`-style, imported with `docker import`; no registry needed).
 *
 * Each argument is one step, run in order:
 *   out:TEXT        print TEXT on stdout          err:TEXT      print TEXT on stderr
 *   interleave:N    N lines alternating stdout/stderr ("out i" / "err i"), each flushed
 *   env:NAME        print NAME=<value> (or NAME unset)
 *   id              print "uid=U gid=G"
 *   caps            print the effective capability mask (CapEff from /proc/self/status)
 *   nnp             print the NoNewPrivs flag from /proc/self/status
 *   net             print "iface NAME" for each network interface, then try a TCP connection to
 *                   192.0.2.1:80 (TEST-NET-1) and print "connect: <result>"
 *   cat:PATH        print the file at PATH             write:PATH=TEXT   write TEXT to PATH
 *   touch:PATH      try to open PATH for writing; print "touch PATH: ok" or the error (never fails)
 *   stdin           print every stdin line prefixed with "stdin: "
 *   sleep:MS        sleep MS milliseconds
 *   alloc:MIB       allocate and touch MIB MiB, then print "allocated MIB MiB"
 *   fork:N          try to start N processes that sleep 5 s; print how many started
 *   vram:MIB        (with the NVML test double) hold MIB MiB of "VRAM" on the first GPU of
 *                   CUDA_VISIBLE_DEVICES: writes $RHIZOS_NVML_DOUBLE_DIR/procs/<pid>, which is
 *                   what the double's driver reports for this process
 *   fill:PATH=MIB   write MIB MiB to PATH; print "filled N MiB of PATH" (N: what fitted)
 *   daemon:S        start a process that leaves the session (setsid, double fork) and lives S
 *                   seconds; print "daemon <pid>"
 *   exit:N          exit with code N (the default is 0)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void say(FILE *f, const char *text) {
    fprintf(f, "%s\n", text);
    fflush(f);
}

static void status_field(const char *field) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[512];
    if (!f) { say(stdout, "no /proc/self/status"); return; }
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, field, strlen(field)) == 0) { fputs(line, stdout); fflush(stdout); }
    }
    fclose(f);
}

static void net(void) {
    FILE *f = fopen("/proc/net/dev", "r");
    char line[512];
    int n = 0;
    if (f) {
        while (fgets(line, sizeof line, f)) {
            char *colon = strchr(line, ':');
            if (++n <= 2 || !colon) continue;
            *colon = 0;
            char *name = line;
            while (*name == ' ') name++;
            printf("iface %s\n", name);
        }
        fclose(f);
    }
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr = {0};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(80);
    inet_pton(AF_INET, "192.0.2.1", &addr.sin_addr);
    struct timeval tv = {1, 0};
    setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (connect(s, (struct sockaddr *)&addr, sizeof addr) == 0) printf("connect: ok\n");
    else printf("connect: %s\n", strerror(errno));
    fflush(stdout);
    close(s);
}

int main(int argc, char **argv) {
    int code = 0;
    for (int i = 1; i < argc; i++) {
        char *step = argv[i];
        char *arg = strchr(step, ':');
        if (arg) *arg++ = 0; else arg = "";
        if (!strcmp(step, "out")) say(stdout, arg);
        else if (!strcmp(step, "err")) say(stderr, arg);
        else if (!strcmp(step, "interleave")) {
            int n = atoi(arg);
            for (int k = 0; k < n; k++) {
                if (k % 2 == 0) fprintf(stdout, "out %d\n", k), fflush(stdout);
                else fprintf(stderr, "err %d\n", k), fflush(stderr);
                usleep(2000);
            }
        } else if (!strcmp(step, "env")) {
            const char *v = getenv(arg);
            if (v) printf("%s=%s\n", arg, v); else printf("%s unset\n", arg);
            fflush(stdout);
        } else if (!strcmp(step, "id")) {
            printf("uid=%d gid=%d\n", (int)getuid(), (int)getgid());
            fflush(stdout);
        } else if (!strcmp(step, "caps")) status_field("CapEff");
        else if (!strcmp(step, "nnp")) status_field("NoNewPrivs");
        else if (!strcmp(step, "net")) net();
        else if (!strcmp(step, "cat")) {
            FILE *f = fopen(arg, "r");
            char buf[4096];
            size_t n;
            if (!f) { fprintf(stderr, "cat %s: %s\n", arg, strerror(errno)); code = 2; continue; }
            while ((n = fread(buf, 1, sizeof buf, f)) > 0) fwrite(buf, 1, n, stdout);
            fclose(f);
            fflush(stdout);
        } else if (!strcmp(step, "write")) {
            char *eq = strchr(arg, '=');
            if (!eq) { say(stderr, "write needs PATH=TEXT"); code = 2; continue; }
            *eq = 0;
            FILE *f = fopen(arg, "w");
            if (!f) { fprintf(stderr, "write %s: %s\n", arg, strerror(errno)); fflush(stderr); code = 2; continue; }
            fputs(eq + 1, f);
            fclose(f);
        } else if (!strcmp(step, "fill")) {
            char *eq = strchr(arg, '=');
            if (!eq) { say(stderr, "fill needs PATH=MIB"); code = 2; continue; }
            *eq = 0;
            long mib = atol(eq + 1), k = 0;
            static char block[1 << 20];
            memset(block, 'x', sizeof block);
            FILE *f = fopen(arg, "w");
            if (!f) { fprintf(stderr, "fill %s: %s\n", arg, strerror(errno)); fflush(stderr); code = 2; continue; }
            for (; k < mib; k++) {
                if (fwrite(block, 1, sizeof block, f) != sizeof block || fflush(f) != 0) break;
            }
            fclose(f);
            printf("filled %ld MiB of %s\n", k, arg);
            fflush(stdout);
        } else if (!strcmp(step, "daemon")) {
            /* Leaves the process group and the session and lives on: prints its pid. */
            int pipefd[2];
            if (pipe(pipefd) != 0) { say(stderr, "pipe failed"); return 3; }
            pid_t pid = fork();
            if (pid == 0) {
                setsid();
                if (fork() != 0) _exit(0);
                char line[32];
                int n = snprintf(line, sizeof line, "%d\n", (int)getpid());
                if (write(pipefd[1], line, n) != n) _exit(1);
                close(pipefd[1]);
                close(0); close(1); close(2);
                sleep(atoi(arg) > 0 ? atoi(arg) : 60);
                _exit(0);
            }
            close(pipefd[1]);
            char line[32] = {0};
            ssize_t n = read(pipefd[0], line, sizeof line - 1);
            if (n > 0) printf("daemon %s", line);
            fflush(stdout);
            waitpid(pid, NULL, 0);
        } else if (!strcmp(step, "touch")) {
            int fd = open(arg, O_WRONLY | O_CREAT, 0644);
            if (fd >= 0) { printf("touch %s: ok\n", arg); close(fd); }
            else printf("touch %s: %s\n", arg, strerror(errno));
            fflush(stdout);
        } else if (!strcmp(step, "stdin")) {
            char line[4096];
            while (fgets(line, sizeof line, stdin)) printf("stdin: %s", line);
            fflush(stdout);
        } else if (!strcmp(step, "sleep")) {
            long ms = atol(arg);
            struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
            nanosleep(&ts, NULL);
        } else if (!strcmp(step, "alloc")) {
            long mib = atol(arg);
            for (long k = 0; k < mib; k++) {
                char *p = malloc(1 << 20);
                if (!p) { say(stderr, "malloc failed"); return 3; }
                memset(p, 1, 1 << 20);
            }
            printf("allocated %ld MiB\n", mib);
            fflush(stdout);
        } else if (!strcmp(step, "fork")) {
            int n = atoi(arg), started = 0;
            for (int k = 0; k < n; k++) {
                pid_t pid = fork();
                if (pid == 0) { sleep(5); _exit(0); }
                if (pid > 0) started++;
            }
            printf("started %d of %d\n", started, n);
            fflush(stdout);
        } else if (!strcmp(step, "vram")) {
            const char *root = getenv("RHIZOS_NVML_DOUBLE_DIR");
            const char *devices = getenv("CUDA_VISIBLE_DEVICES");
            if (!root || !devices) { say(stderr, "vram needs RHIZOS_NVML_DOUBLE_DIR and CUDA_VISIBLE_DEVICES"); return 2; }
            char device[128];
            snprintf(device, sizeof device, "%s", devices);
            char *comma = strchr(device, ',');
            if (comma) *comma = 0;
            char path[4096];
            snprintf(path, sizeof path, "%s/procs/%d", root, (int)getpid());
            FILE *f = fopen(path, "w");
            if (!f) { fprintf(stderr, "vram: %s: %s\n", path, strerror(errno)); return 2; }
            fprintf(f, "%s %llu\n", device, (unsigned long long)atol(arg) << 20);
            fclose(f);
            printf("holding %s MiB on %s\n", arg, device);
            fflush(stdout);
        } else if (!strcmp(step, "exit")) return atoi(arg);
        else { fprintf(stderr, "unknown step %s\n", step); return 64; }
    }
    return code;
}
