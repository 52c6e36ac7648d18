// SPDX-License-Identifier: GPL-2.0
// The vsock server of shared/seeds/002 ("vsock notes"), as written there
// apart from its CID and port, which the build passes as SEED_CID and
// SEED_PORT (tools/build-scenarios.sh; default: the seed's own).
#ifndef SEED_CID
#define SEED_CID VMADDR_CID_HOST
#endif
#ifndef SEED_PORT
#define SEED_PORT 9999
#endif

#include <sys/socket.h>
#include <linux/vm_sockets.h>
#include <string.h>
#include <stdio.h>

int main()
{
	int s = socket(AF_VSOCK, SOCK_STREAM, 0);

	struct sockaddr_vm addr;
	memset(&addr, 0, sizeof(struct sockaddr_vm));
	addr.svm_family = AF_VSOCK;
	addr.svm_port = SEED_PORT;
	addr.svm_cid = SEED_CID;

	bind(s, &addr, sizeof(struct sockaddr_vm));

	listen(s, 0);

	struct sockaddr_vm peer_addr;
	socklen_t peer_addr_size = sizeof(struct sockaddr_vm);
	int peer_fd = accept(s, &peer_addr, &peer_addr_size);

	char buf[64];
	size_t msg_len;
	while ((msg_len = recv(peer_fd, &buf, 64, 0)) > 0) {
		printf("Received %lu bytes: %.*s\n", msg_len, msg_len, buf);
	}

	return 0;
}
