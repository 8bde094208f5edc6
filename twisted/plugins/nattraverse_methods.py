from nattraverse.methods.direct import DirectMethod
from nattraverse.methods.relay import RelayMethod
from nattraverse.methods.reversal import ReversalMethod
from nattraverse.methods.tcp import TcpMethod
from nattraverse.methods.udp import UdpMethod

direct = DirectMethod()
reversal = ReversalMethod()
tcp = TcpMethod()
udp = UdpMethod()
relay = RelayMethod()
