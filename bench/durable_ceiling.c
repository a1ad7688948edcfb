/* Receive benchmark only: how fast a durable C-STORE receiver written in C can be on this machine.
 *
 * It is a measuring stick, not a receiver to deploy: it trusts its peer (storescu on loopback), accepts
 * every presentation context, and checks nothing in a data set beyond its C-STORE command. What it keeps is
 * the node's durability rule, at the least cost C allows: an instance is answered Success only after its
 * Part 10 file (preamble, file meta, data set as received) is written under a temp name, renamed into place
 * and fsynced, its folder fsynced and its index row committed (SQLite WAL, synchronous=FULL). The folder
 * fsync and the commit are shared by every instance waiting at that moment (group commit across
 * associations, one thread per association), as in the node; the folder's fsync also overlaps the files'.
 *
 * Build: cc -O2 -pthread -o durable_ceiling durable_ceiling.c -lsqlite3
 * Run:   durable_ceiling PORT DIR        (files in DIR/store, index in DIR/index.sqlite; 127.0.0.1 only)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <sqlite3.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#define MAX_PDU 262144u
#define MAX_BATCH 256
#define UID_MAX 64
#define IMPL_UID "1.2.826.0.1.3680043.10.1234.99.1"

static const char *store_dir;
static int store_fd;
static sqlite3 *db;
static sqlite3_stmt *insert;

static void die(const char *what);

/* The folder's fsync runs in a thread of its own, overlapping the files' fsyncs: it covers every rename
 * counted before it started. (One syncfs per batch instead of the fsyncs was slower here.) */

static pthread_mutex_t dir_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t dir_cond = PTHREAD_COND_INITIALIZER;
static long renamed, dir_synced;

static void *dir_flusher(void *arg) {
    (void)arg;
    pthread_mutex_lock(&dir_lock);
    for (;;) {
        while (dir_synced == renamed)
            pthread_cond_wait(&dir_cond, &dir_lock);
        long target = renamed;
        pthread_mutex_unlock(&dir_lock);
        if (fsync(store_fd) != 0)
            die("fsync folder");
        pthread_mutex_lock(&dir_lock);
        dir_synced = target;
        pthread_cond_broadcast(&dir_cond);
    }
    return NULL;
}

static void die(const char *what) {
    perror(what);
    exit(2);
}

static int read_full(int fd, uint8_t *buf, size_t n) {
    while (n) {
        ssize_t r = read(fd, buf, n);
        if (r <= 0) {
            if (r < 0 && errno == EINTR)
                continue;
            return -1;
        }
        buf += r, n -= (size_t)r;
    }
    return 0;
}

static int write_full(int fd, const uint8_t *buf, size_t n) {
    while (n) {
        ssize_t w = write(fd, buf, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        buf += w, n -= (size_t)w;
    }
    return 0;
}

static uint16_t be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static uint32_t be32(const uint8_t *p) { return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3]; }
static uint16_t le16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint32_t le32(const uint8_t *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24; }
static void put_be16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8), p[1] = (uint8_t)v; }
static void put_be32(uint8_t *p, uint32_t v) { p[0] = (uint8_t)(v >> 24), p[1] = (uint8_t)(v >> 16), p[2] = (uint8_t)(v >> 8), p[3] = (uint8_t)v; }
static void put_le16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v, p[1] = (uint8_t)(v >> 8); }
static void put_le32(uint8_t *p, uint32_t v) { p[0] = (uint8_t)v, p[1] = (uint8_t)(v >> 8), p[2] = (uint8_t)(v >> 16), p[3] = (uint8_t)(v >> 24); }

/* a UID value without its padding; 0 if it does not fit */
static int copy_uid(char *dst, const uint8_t *src, size_t n) {
    while (n && (src[n - 1] == 0 || src[n - 1] == ' '))
        n--;
    if (n == 0 || n > UID_MAX)
        return 0;
    memcpy(dst, src, n);
    dst[n] = 0;
    return 1;
}

/* ---- group commit: one transaction for every instance waiting -------------------------------------- */

struct entry {
    char sop[UID_MAX + 1], cls[UID_MAX + 1];
    long size;
};

static pthread_mutex_t gc_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t gc_done = PTHREAD_COND_INITIALIZER;
static struct entry queue[MAX_BATCH];
static int queued, leading;
static long issued, committed;

static void commit_batch(const struct entry *batch, int n) {
    if (sqlite3_exec(db, "BEGIN", 0, 0, 0) != SQLITE_OK)
        die("BEGIN");
    for (int i = 0; i < n; i++) {
        sqlite3_bind_text(insert, 1, batch[i].sop, -1, SQLITE_STATIC);
        sqlite3_bind_text(insert, 2, batch[i].cls, -1, SQLITE_STATIC);
        sqlite3_bind_int64(insert, 3, batch[i].size);
        if (sqlite3_step(insert) != SQLITE_DONE)
            die("INSERT");
        sqlite3_reset(insert);
    }
    if (sqlite3_exec(db, "COMMIT", 0, 0, 0) != SQLITE_OK)
        die("COMMIT");
}

static void index_durably(const struct entry *e) {
    static struct entry batch[MAX_BATCH];
    pthread_mutex_lock(&gc_lock);
    while (queued == MAX_BATCH)
        pthread_cond_wait(&gc_done, &gc_lock);
    queue[queued++] = *e;
    long ticket = ++issued;
    while (committed < ticket) {
        if (leading) {
            pthread_cond_wait(&gc_done, &gc_lock);
            continue;
        }
        leading = 1;
        int n = queued;
        long last = issued;
        memcpy(batch, queue, sizeof queue[0] * (size_t)n);
        queued = 0;
        pthread_mutex_unlock(&gc_lock);
        commit_batch(batch, n);
        pthread_mutex_lock(&gc_lock);
        committed = last;
        leading = 0;
        pthread_cond_broadcast(&gc_done);
    }
    pthread_mutex_unlock(&gc_lock);
}

/* ---- one association ------------------------------------------------------------------------------- */

struct pcontext {
    char as[UID_MAX + 1], ts[UID_MAX + 1];
};

struct conn {
    int sock;
    struct pcontext pc[256];
    uint8_t *pdu;
    uint8_t *cmd;
    size_t cmd_len;
    int file;           /* temp file of the data set being received, -1 if none */
    char tmp[64];
    struct entry cur;
    uint16_t msg_id;
    uint8_t pcid;
    long serial;
};

static int send_pdu(struct conn *c, uint8_t type, const uint8_t *body, uint32_t n) {
    uint8_t head[6] = {type, 0};
    put_be32(head + 2, n);
    if (write_full(c->sock, head, 6) != 0)
        return -1;
    return write_full(c->sock, body, n);
}

static size_t put_item(uint8_t *p, uint8_t type, const void *value, uint16_t n) {
    p[0] = type, p[1] = 0;
    put_be16(p + 2, n);
    memcpy(p + 4, value, n);
    return 4u + n;
}

static int associate(struct conn *c, const uint8_t *rq, uint32_t n) {
    static const char explicit_le[] = "1.2.840.10008.1.2.1", implicit_le[] = "1.2.840.10008.1.2";
    uint8_t ac[4096], *p = ac;
    if (n < 68)
        return -1;
    memcpy(p, rq, 68); /* version, reserved, called and calling AE titles, reserved: echoed */
    p += 68;
    for (uint32_t off = 68; off + 4 <= n;) {
        uint8_t type = rq[off];
        uint16_t len = be16(rq + off + 2);
        const uint8_t *v = rq + off + 4;
        if (off + 4 + len > n)
            return -1;
        if (type == 0x10) {
            p += put_item(p, 0x10, v, len);
        } else if (type == 0x20 && len >= 4) {
            uint8_t id = v[0], offered[8][UID_MAX + 1];
            int count = 0;
            char as[UID_MAX + 1] = "";
            for (uint16_t s = 4; s + 4 <= len;) {
                uint16_t sl = be16(v + s + 2);
                if (s + 4 + sl > len)
                    return -1;
                if (v[s] == 0x30)
                    copy_uid(as, v + s + 4, sl);
                else if (v[s] == 0x40 && count < 8 && copy_uid((char *)offered[count], v + s + 4, sl))
                    count++;
                s += 4 + sl;
            }
            int pick = 0, rank = 0; /* explicit VR little endian, else implicit, else the first offered */
            for (int i = 0; i < count; i++) {
                int r = !strcmp((char *)offered[i], explicit_le) ? 2 : !strcmp((char *)offered[i], implicit_le);
                if (r > rank)
                    pick = i, rank = r;
            }
            uint8_t item[4 + 4 + UID_MAX] = {id, 0, count ? 0 : 4, 0}; /* accepted, or no transfer syntax */
            uint16_t tl = count ? (uint16_t)strlen((char *)offered[pick]) : 0;
            item[4] = 0x40, item[5] = 0;
            put_be16(item + 6, tl);
            memcpy(item + 8, offered[pick], tl);
            if ((size_t)(p - ac) + 12 + tl > sizeof ac - 128)
                return -1;
            p += put_item(p, 0x21, item, (uint16_t)(8 + tl));
            strcpy(c->pc[id].as, as);
            strcpy(c->pc[id].ts, count ? (char *)offered[pick] : "");
        }
        off += 4 + len;
    }
    uint8_t user[64], *u = user, max[4];
    put_be32(max, MAX_PDU);
    u += put_item(u, 0x51, max, 4);
    u += put_item(u, 0x52, IMPL_UID, (uint16_t)strlen(IMPL_UID));
    p += put_item(p, 0x50, user, (uint16_t)(u - user));
    return send_pdu(c, 0x02, ac, (uint32_t)(p - ac));
}

static size_t put_elem(uint8_t *p, uint16_t elem, const void *value, uint32_t n) {
    put_le16(p, 0), put_le16(p + 2, elem), put_le32(p + 4, n);
    memcpy(p + 8, value, n);
    return 8u + n;
}

static size_t put_uid_elem(uint8_t *p, uint16_t elem, const char *uid) {
    uint8_t v[UID_MAX + 2] = {0};
    size_t n = strlen(uid);
    memcpy(v, uid, n);
    return put_elem(p, elem, v, (uint32_t)(n + (n & 1)));
}

static int respond(struct conn *c, uint16_t field, const char *cls, const char *sop, uint16_t status) {
    uint8_t pdu[512], *cmd = pdu + 6, *p = cmd + 12; /* PDV length, context, header; group length element */
    uint8_t us[2];
    p += put_uid_elem(p, 0x0002, cls);
    put_le16(us, field), p += put_elem(p, 0x0100, us, 2);
    put_le16(us, c->msg_id), p += put_elem(p, 0x0120, us, 2);
    put_le16(us, 0x0101), p += put_elem(p, 0x0800, us, 2);
    put_le16(us, status), p += put_elem(p, 0x0900, us, 2);
    if (sop)
        p += put_uid_elem(p, 0x1000, sop);
    uint8_t len[4];
    put_le32(len, (uint32_t)(p - cmd - 12));
    put_elem(cmd, 0x0000, len, 4);
    put_be32(pdu, (uint32_t)(p - pdu - 4)), pdu[4] = c->pcid, pdu[5] = 0x03;
    return send_pdu(c, 0x04, pdu, (uint32_t)(p - pdu));
}

static int start_store(struct conn *c) {
    const char *ts = c->pc[c->pcid].ts;
    snprintf(c->tmp, sizeof c->tmp, ".tmp-%lx-%ld", (unsigned long)pthread_self(), c->serial++);
    c->file = openat(store_fd, c->tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (c->file < 0)
        return -1;
    uint8_t meta[512] = {0}, *p = meta + 132 + 12;
    memcpy(meta + 128, "DICM", 4);
    uint8_t *e = p;
    static const uint8_t version[] = {2, 0, 1, 0, 'O', 'B', 0, 0, 2, 0, 0, 0, 0, 1};
    memcpy(e, version, sizeof version), e += sizeof version;
    const char *values[] = {c->cur.cls, c->cur.sop, ts, IMPL_UID};
    const uint16_t elems[] = {0x0002, 0x0003, 0x0010, 0x0012};
    for (int i = 0; i < 4; i++) {
        size_t n = strlen(values[i]), padded = n + (n & 1);
        put_le16(e, 2), put_le16(e + 2, elems[i]), e[4] = 'U', e[5] = 'I', put_le16(e + 6, (uint16_t)padded);
        memcpy(e + 8, values[i], n);
        e += 8 + padded;
    }
    uint8_t *g = meta + 132;
    put_le16(g, 2), put_le16(g + 2, 0), g[4] = 'U', g[5] = 'L', put_le16(g + 6, 4), put_le32(g + 8, (uint32_t)(e - p));
    c->cur.size = e - meta;
    return write_full(c->file, meta, (size_t)(e - meta));
}

static int finish_store(struct conn *c) {
    char name[UID_MAX + 8];
    snprintf(name, sizeof name, "%s.dcm", c->cur.sop);
    if (renameat(store_fd, c->tmp, store_fd, name) != 0)
        return -1;
    pthread_mutex_lock(&dir_lock);
    long ticket = ++renamed;
    pthread_cond_broadcast(&dir_cond);
    pthread_mutex_unlock(&dir_lock);
    if (fsync(c->file) != 0)
        return -1;
    pthread_mutex_lock(&dir_lock);
    while (dir_synced < ticket)
        pthread_cond_wait(&dir_cond, &dir_lock);
    pthread_mutex_unlock(&dir_lock);
    close(c->file);
    c->file = -1;
    index_durably(&c->cur);
    return respond(c, 0x8001, c->cur.cls, c->cur.sop, 0x0000);
}

static int command(struct conn *c) {
    uint16_t field = 0, has_data = 0x0101;
    c->cur.cls[0] = c->cur.sop[0] = 0;
    for (size_t off = 0; off + 8 <= c->cmd_len;) {
        uint16_t elem = le16(c->cmd + off + 2);
        uint32_t n = le32(c->cmd + off + 4);
        const uint8_t *v = c->cmd + off + 8;
        if (n > c->cmd_len - off - 8)
            return -1;
        if (elem == 0x0002)
            copy_uid(c->cur.cls, v, n);
        else if (elem == 0x1000)
            copy_uid(c->cur.sop, v, n);
        else if (elem == 0x0100 && n == 2)
            field = le16(v);
        else if (elem == 0x0110 && n == 2)
            c->msg_id = le16(v);
        else if (elem == 0x0800 && n == 2)
            has_data = le16(v);
        off += 8 + n;
    }
    c->cmd_len = 0;
    if (field == 0x0030)
        return respond(c, 0x8030, c->cur.cls, NULL, 0x0000);
    if (field != 0x0001 || has_data == 0x0101 || !c->cur.sop[0] || !c->cur.cls[0] || strchr(c->cur.sop, '/'))
        return -1;
    return start_store(c);
}

static int pdata(struct conn *c, const uint8_t *b, uint32_t n) {
    for (uint32_t off = 0; off + 6 <= n;) {
        uint32_t len = be32(b + off);
        if (len < 2 || len > n - off - 4)
            return -1;
        uint8_t header = b[off + 5];
        const uint8_t *v = b + off + 6;
        uint32_t vn = len - 2;
        c->pcid = b[off + 4];
        if (header & 1) {
            if (c->cmd_len + vn > 4096)
                return -1;
            memcpy(c->cmd + c->cmd_len, v, vn);
            c->cmd_len += vn;
            if ((header & 2) && command(c) != 0)
                return -1;
        } else {
            if (c->file < 0 || write_full(c->file, v, vn) != 0)
                return -1;
            c->cur.size += vn;
            if ((header & 2) && finish_store(c) != 0)
                return -1;
        }
        off += 4 + len;
    }
    return 0;
}

static void *serve(void *arg) {
    struct conn *c = arg;
    uint8_t head[6];
    while (read_full(c->sock, head, 6) == 0) {
        uint32_t n = be32(head + 2);
        if (n > MAX_PDU + 64 || read_full(c->sock, c->pdu, n) != 0)
            break;
        int rc = 0;
        if (head[0] == 0x01)
            rc = associate(c, c->pdu, n);
        else if (head[0] == 0x04)
            rc = pdata(c, c->pdu, n);
        else if (head[0] == 0x05) {
            static const uint8_t reserved[4];
            send_pdu(c, 0x06, reserved, 4);
            break;
        } else
            break;
        if (rc != 0) {
            static const uint8_t abort_body[4];
            send_pdu(c, 0x07, abort_body, 4);
            break;
        }
    }
    if (c->file >= 0) {
        close(c->file);
        unlinkat(store_fd, c->tmp, 0);
    }
    close(c->sock);
    free(c->pdu);
    free(c->cmd);
    free(c);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s PORT DIR\n", argv[0]);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    char path[4096];
    snprintf(path, sizeof path, "%s/store", argv[2]);
    mkdir(path, 0700);
    store_dir = path;
    if ((store_fd = open(store_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)) < 0)
        die("open store");
    pthread_t flusher;
    if (pthread_create(&flusher, NULL, dir_flusher, NULL) != 0)
        die("pthread_create");
    char index[4096];
    snprintf(index, sizeof index, "%s/index.sqlite", argv[2]);
    if (sqlite3_open(index, &db) != SQLITE_OK ||
        sqlite3_exec(db, "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;"
                         "CREATE TABLE IF NOT EXISTS instances(sop_instance_uid TEXT PRIMARY KEY,"
                         " sop_class_uid TEXT NOT NULL, size INTEGER NOT NULL)", 0, 0, 0) != SQLITE_OK ||
        sqlite3_prepare_v2(db, "INSERT OR REPLACE INTO instances VALUES (?, ?, ?)", -1, &insert, 0) != SQLITE_OK)
        die("sqlite");
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), one = 1;
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[1]))};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(ls, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(ls, 64) != 0)
        die("listen");
    for (;;) {
        int s = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
        if (s < 0)
            continue;
        setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct conn *c = calloc(1, sizeof *c);
        c->sock = s, c->file = -1;
        c->pdu = malloc(MAX_PDU + 64);
        c->cmd = malloc(4096);
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        if (!c->pdu || !c->cmd || pthread_create(&t, &attr, serve, c) != 0) {
            close(s);
            free(c->pdu), free(c->cmd), free(c);
        }
        pthread_attr_destroy(&attr);
    }
}
