// ChatView.swift: a minimal SwiftUI screen on top of the generated MLXKitBundle.swift.
// Not compiled here (no iOS toolchain): checked for syntax, and its mlx-swift-lm names against
// the table read from mlx-swift-lm's source (tests/swift_api.toml). Needs mlx-swift-lm 3.32.3
// or later: ModelContainer.perform, UserInput, generate(input:parameters:context:). Decodes
// without the MTP drafter, so any temperature works (mlx-swift-lm's Qwen 3.5 drafter is
// greedy-only). A picture goes with the prompt when the bundle's container reads images
// (model/ holds the vision tower), resized to the size the memory plan made room for.

import CoreImage
import MLX  // MLXArray.size
import MLXHuggingFace
import MLXLLM
import MLXLMCommon
import SwiftUI
import Tokenizers  // #huggingFaceTokenizerLoader() expands to Tokenizers.AutoTokenizer

@MainActor
@Observable
final class ChatModel {
    var status = "Not loaded"
    var reply = ""
    private var loaded: MLXKitLoaded?

    func load() async {
        guard let url = MLXKitBundle.locate() else {
            status = "The model has not been downloaded yet."
            return
        }
        do {
            loaded = try await MLXKitBundle.load(from: url, using: #huggingFaceTokenizerLoader())
            if let check = loaded?.check, !check.deviceListed {
                status = "Loaded (this device, \(check.deviceModel), was not in the plan)"
            } else {
                status = "Loaded"
            }
        } catch {
            status = error.localizedDescription
        }
    }

    func send(_ prompt: String, image: CIImage? = nil) async {
        guard let loaded else { return }
        reply = ""
        // a picture only when the container reads images (model/ holds the vision tower)
        let picture = loaded.readsImages ? image : nil
        var processing = UserInput.Processing()
        if let picture {
            processing = loaded.imageProcessing(
                width: Int(picture.extent.width), height: Int(picture.extent.height))
        }
        do {
            let stream = try await loaded.container.perform { context in
                let images: [UserInput.Image] = picture.map { [.ciImage($0)] } ?? []
                let input = try await context.processor.prepare(
                    input: UserInput(chat: [.user(prompt, images: images)], processing: processing))
                var parameters = loaded.parameters
                // stay within the context the memory plan was made for
                parameters.maxTokens = loaded.maxNewTokens(promptTokens: input.text.tokens.size)
                return try MLXLMCommon.generate(
                    input: input, parameters: parameters, context: context)
            }
            for await event in stream {
                if let chunk = event.chunk {
                    reply += chunk
                }
            }
        } catch {
            status = error.localizedDescription
        }
    }
}

struct ChatView: View {
    @State private var model = ChatModel()
    @State private var prompt = ""

    var body: some View {
        VStack(alignment: .leading, spacing: 12) {
            Text(model.status).font(.caption)
            ScrollView { Text(model.reply).frame(maxWidth: .infinity, alignment: .leading) }
            HStack {
                TextField("Ask something", text: $prompt)
                Button("Send") { Task { await model.send(prompt) } }
            }
        }
        .padding()
        .task { await model.load() }
    }
}
